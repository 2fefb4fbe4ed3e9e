"""Tunnel streams as anyio ``ByteStream`` s, with backpressure both ways.

The bookkeeping (received bytes, end, reset, acceptance, credit, send capacity) is
the core's :class:`~snocat_proto.stream_handle.StreamHandle`; this module adds the
waiting.  Reading acknowledges the bytes to the core, which is what lets the peer
send more: a reader that stops reading stops its sender.  Writing waits while the
stream's send buffer is full.  A reset or a closed tunnel surfaces on the next call
as a typed error (:class:`StreamResetError`, :class:`TunnelClosedError`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import anyio
import anyio.abc

from snocat_proto._service.stream_handle import (
    Blocked,
    HandleView,
    Opening,
    StreamHandle,
)
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.codes import StreamCode
from snocat_proto._wire.events import TunnelEvent
from snocat_proto._wire.tunnel import TunnelConnection

from ._errors import StreamRefusedError, failure_error

DEFAULT_RECEIVE_SIZE = 65536


class TunnelStream(HandleView, anyio.abc.ByteStream):
    """One bidirectional stream of a tunnel."""

    def __init__(
        self,
        tunnel: TunnelConnection,
        stream_id: int,
        address: RouteAddress,
        *,
        flush: Callable[[], None],
        forget: Callable[[TunnelStream], None],
        accepted: bool,
    ) -> None:
        self.handle = StreamHandle(tunnel, stream_id, address, accepted=accepted)
        self._flush = flush
        self._forget = forget
        self._changed = anyio.Event()
        self._waiters = 0

    # anyio ByteStream --------------------------------------------------------

    async def receive(self, max_bytes: int = DEFAULT_RECEIVE_SIZE) -> bytes:
        while True:
            data = self.handle.read(max_bytes)
            if isinstance(data, bytes):
                # The credit goes out with the next datagram anyway; transmit at once
                # only when the peer is about to run out of it (per half window).
                if self.tunnel.credit_update_due(self.stream_id):
                    self._flush()
                return data
            if data is not Blocked.WAIT:
                self._raise(data)
            await self._wait()

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            sent = self.handle.write(view)
            if isinstance(sent, Blocked):
                if sent is not Blocked.WAIT:
                    self._raise(sent)
                await self._wait()
                continue
            view = view[sent:]
            self._flush()

    def try_send(self, item: bytes) -> bool:
        """(Never waits) Send all of ``item`` if the send buffer takes it whole now,
        else nothing: False.  Raises as :meth:`send` does for a stream that cannot
        send.  For datagrams framed on a stream, which are dropped, not queued."""
        sent = self.handle.write_whole(item)
        if isinstance(sent, Blocked):
            self._raise(sent)
        if sent:
            self._flush()
        return sent

    async def sendall(self, item: bytes) -> None:
        """:meth:`send`, under the name the blocking binding's streams use."""
        await self.send(item)

    async def send_eof(self) -> None:
        if self.handle.eof_sent:
            return
        blocked = self.handle.send_eof()
        if blocked is not None:
            self._raise(blocked)
        self._flush()

    async def aclose(self) -> None:
        """Finish our direction (data already written is still delivered) and stop
        reading; the stream's resources are released."""
        if self.handle.close():
            self._flush()
            self._forget(self)
            self._notify()

    def reset(self, code: int = StreamCode.CANCELLED) -> None:
        """Abort both directions at once; unsent data is dropped."""
        if self.handle.reset(code):
            self._flush()
            self._forget(self)
            self._notify()

    @property
    def extra_attributes(self) -> dict[Any, Callable[[], Any]]:
        return {}

    # Fed by the host ---------------------------------------------------------

    def on_event(self, event: TunnelEvent) -> None:
        if self.handle.on_event(event):
            if self.handle.finished:
                self._forget(self)
            self._notify()

    def on_tunnel_closed(self, code: int, reason: str) -> None:
        self.handle.on_tunnel_closed(code, reason)
        self._notify()

    async def wait_accepted(self) -> None:
        """(Opener) Wait for the peer's decision; raise if it refused."""
        while (opening := self.handle.opening) is Opening.PENDING:
            await self._wait()
        if opening is Opening.TUNNEL_CLOSED:
            failure = self.handle.failure
            assert failure is not None
            raise failure_error(failure)
        if opening is Opening.REFUSED:
            raise StreamRefusedError(self.handle.refusal)

    # Internals ---------------------------------------------------------------

    def _raise(self, blocked: Blocked) -> NoReturn:
        if blocked is Blocked.END:
            raise anyio.EndOfStream
        if blocked is Blocked.FAILED:
            failure = self.handle.failure
            assert failure is not None
            raise failure_error(failure)
        if blocked is Blocked.EOF_SENT:
            raise anyio.ClosedResourceError("send_eof() was already called")
        raise anyio.ClosedResourceError

    async def _wait(self) -> None:
        self._waiters += 1
        try:
            await self._changed.wait()
        finally:
            self._waiters -= 1

    def _notify(self) -> None:
        # Every waiter checks the handle before it waits, so with nobody waiting
        # there is nobody to wake (and no new Event to make, once per datagram).
        if self._waiters:
            self._changed.set()
            self._changed = anyio.Event()
