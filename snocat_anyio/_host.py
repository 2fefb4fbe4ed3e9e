"""The pump: one UDP socket feeding one core endpoint, under anyio.

:class:`TunnelHost` is the whole QUIC I/O of a snocat endpoint, server or client:
it reads every waiting datagram into the core, lets the core's
:class:`~snocat_proto._service.pump.Pump` drain events and transmit, and keeps one
timer task that it wakes only when the deadline moved earlier (aioquic's
``asyncio/protocol.py`` pattern).  The socket is a non-blocking stdlib socket, so
sending never waits: a full send buffer is a lost datagram, which QUIC recovers
like any other.  The pump task shields itself from its caller's cancellation, so
datagrams keep moving while a cancelled server or client says goodbye; its owner
stops it with :meth:`TunnelHost.stop`.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable

import anyio
import anyio.abc

from snocat_proto._service.pump import EventHandler, Pump
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.endpoint import Endpoint
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.network import NetworkAddress
from snocat_proto._wire.tunnel import TunnelConnection

from ._backend import Lock
from ._stream import TunnelStream
from ._udp import UdpBatching, receive_batch, send_datagrams

logger = logging.getLogger("snocat.host")
DEFAULT_LIMITS = Limits()


class TunnelHost:
    """Runs ``endpoint`` on ``sock``; see the module docstring."""

    def __init__(
        self,
        endpoint: Endpoint,
        sock: socket.socket,
        on_event: EventHandler[TunnelStream],
        *,
        limits: Limits = DEFAULT_LIMITS,
        lock: Lock | None = None,
        name: str = "snocat-pump",
        on_unreachable: Callable[[OSError], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.pump: Pump[TunnelStream] = Pump(endpoint, on_event, self._new_stream)
        self._batch = limits.udp_receive_batch
        #: GSO and GRO on this socket, while the kernel takes them.
        self.batching = UdpBatching(sock, limits.udp_segments_per_call)
        #: Told when the socket reports the peer unreachable (a connected client socket).
        self._on_unreachable = on_unreachable
        self._timer_changed: anyio.Event | None = None
        self._scope = anyio.CancelScope(shield=True)
        self.datagrams_dropped = 0

    @property
    def local_address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    # Lifecycle ---------------------------------------------------------------

    def start(self, group: anyio.abc.TaskGroup | None) -> None:
        """Run the pump in ``group`` until :meth:`stop`.  The socket stays the owner's."""
        if group is None:
            raise RuntimeError("the pump needs the task group it runs in")
        group.start_soon(self._run_shielded)

    def stop(self) -> None:
        """Stop the pump that :meth:`start` started (its task ends as the owner's task
        group winds down)."""
        self._scope.cancel()

    async def _run_shielded(self) -> None:
        with self._scope:
            await self.run()

    async def run(self) -> None:
        """Pump until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._timer_loop)
            self.flush()
            await self._receive_loop()

    # Streams -----------------------------------------------------------------

    async def open_stream(
        self, tunnel: TunnelConnection, address: RouteAddress, timeout: float | None = None
    ) -> TunnelStream:
        """Open a stream to ``address`` on ``tunnel``'s peer and wait for its answer.

        Raises :class:`StreamRefusedError`, :class:`TunnelClosedError`, ``TimeoutError``
        or (the tunnel is not authenticated) ``LocalProtocolError``."""
        stream = self.pump.open_stream(tunnel, address)
        self.flush(tunnel)
        try:
            with anyio.fail_after(timeout):
                await stream.wait_accepted()
        except BaseException:
            with anyio.CancelScope(shield=True):
                stream.reset()
            raise
        return stream

    def accept(self, stream: TunnelStream) -> None:
        self.pump.accept(stream)
        self.flush(stream.tunnel)

    def refuse(self, stream: TunnelStream) -> None:
        self.pump.refuse(stream)
        self.flush(stream.tunnel)

    def streams_of(self, tunnel: TunnelConnection) -> list[TunnelStream]:
        return self.pump.streams.of(tunnel)

    def is_active(self, stream: TunnelStream) -> bool:
        """Whether ``stream`` still gets events (not closed, reset, refused or orphaned):
        once it does not, its byte counts are final."""
        return self.pump.streams.holds(stream)

    # The pump ----------------------------------------------------------------

    def flush(self, tunnel: TunnelConnection | None = None) -> None:
        """Drain events and send datagrams until the core is quiet; re-arm the timer.

        Pass the ``tunnel`` an application call changed, so its output is sent."""
        for error in self.pump.internal_errors():
            logger.error("internal error in a tunnel, which was closed", exc_info=error)
        if self.pump.flush(anyio.current_time(), self._send, tunnel):
            self._wake_timer()

    def _wake_timer(self) -> None:
        if self._timer_changed is not None:
            self._timer_changed.set()

    async def _receive_loop(self) -> None:
        sock = self.sock
        while True:
            await anyio.wait_readable(sock)
            now = anyio.current_time()
            self._unreachable(
                receive_batch(sock, self.endpoint.receive_datagram, now, self._batch, self.batching)
            )
            self.flush()

    async def _timer_loop(self) -> None:
        while True:
            changed = self._timer_changed = anyio.Event()
            timer_at = self.pump.timer_at
            if timer_at is None:
                await changed.wait()
                continue
            delay = timer_at - anyio.current_time()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await changed.wait()
                continue  # look again: the deadline may have moved either way
            self.pump.handle_timer(max(anyio.current_time(), timer_at), self._send)

    def _send(self, datagrams: list[tuple[bytes, NetworkAddress]]) -> None:
        dropped, unreachable = send_datagrams(self.sock, datagrams, self.batching)
        self.datagrams_dropped += dropped
        self._unreachable(unreachable)

    def _unreachable(self, error: OSError | None) -> None:
        if error is not None and self._on_unreachable is not None:
            self._on_unreachable(error)

    def _new_stream(
        self, tunnel: TunnelConnection, stream_id: int, address: RouteAddress, accepted: bool
    ) -> TunnelStream:
        return TunnelStream(
            tunnel,
            stream_id,
            address,
            flush=functools.partial(self.flush, tunnel),
            forget=self.pump.streams.forget,
            accepted=accepted,
        )
