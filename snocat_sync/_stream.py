"""Tunnel streams with a blocking, socket-like API, safe to use from many threads.

The bookkeeping (received bytes, end, reset, acceptance, credit, send capacity) is
the core's :class:`~snocat_proto.stream_handle.StreamHandle`; this module adds the
waiting, on a ``threading.Condition`` of the host's lock that the pump notifies.

Like a socket: ``recv`` returns ``b""`` once the peer finished its direction,
``send`` returns how much it took, ``sendall`` blocks while the stream's send buffer
is full (backpressure), ``shutdown(SHUT_WR)`` half-closes, ``settimeout`` bounds
every blocking call (``TimeoutError``, which is ``socket.timeout``; a timeout of 0
raises ``BlockingIOError`` instead of waiting).  A reset or a closed tunnel surfaces
on the next call as :class:`StreamResetError` / :class:`TunnelClosedError`
(``ConnectionError`` subclasses); a stream closed locally raises ``OSError(EBADF)``.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import NoReturn

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

from ._errors import SnocatError, StreamRefusedError, failure_error

DEFAULT_RECEIVE_SIZE = 65536


class EndOfStream(SnocatError):
    """(:meth:`TunnelStream.receive`) The peer finished its direction of the stream."""


class TunnelStream(HandleView):
    """One bidirectional stream of a tunnel; see the module docstring."""

    def __init__(
        self,
        tunnel: TunnelConnection,
        stream_id: int,
        address: RouteAddress,
        *,
        lock: threading.RLock,
        flush: Callable[[], None],
        forget: Callable[[TunnelStream], None],
        accepted: bool,
    ) -> None:
        self.handle = StreamHandle(tunnel, stream_id, address, accepted=accepted)
        self._lock = lock
        self._changed = threading.Condition(lock)
        self._flush = flush
        self._forget = forget
        self._timeout: float | None = None
        self._on_failure: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<TunnelStream {self.stream_id} {self.address}>"

    # Timeouts ----------------------------------------------------------------

    def settimeout(self, value: float | None) -> None:
        """Bound every blocking call to ``value`` seconds (None: wait forever;
        0: never wait, raise ``BlockingIOError``)."""
        if value is not None:
            value = float(value)
            if not value >= 0 or math.isnan(value):
                raise ValueError("timeout value must be a non-negative number or None")
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    # Reading -----------------------------------------------------------------

    def recv(self, bufsize: int = DEFAULT_RECEIVE_SIZE, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes; ``b""`` once the peer finished its direction."""
        if flags:
            raise ValueError("recv() flags are not supported on tunnel streams")
        if bufsize <= 0:
            if bufsize < 0:
                raise ValueError("negative buffersize in recv")
            return b""
        deadline = self._deadline()
        with self._lock:
            while True:
                data = self.handle.read(bufsize)
                if isinstance(data, bytes):
                    # The credit goes out with the next datagram anyway; transmit at
                    # once only when the peer is about to run out of it.
                    if self.tunnel.credit_update_due(self.stream_id):
                        self._flush()
                    return data
                if data is Blocked.END:
                    return b""
                if data is not Blocked.WAIT:
                    self._raise(data)
                self._wait(deadline)

    def receive(self, max_bytes: int = DEFAULT_RECEIVE_SIZE) -> bytes:
        """Like :meth:`recv`, but the end of the peer's direction raises
        :class:`~snocat_sync.EndOfStream` instead of returning ``b""`` (as anyio's
        streams do: the flows both bindings share read this way)."""
        data = self.recv(max_bytes)
        if not data:
            raise EndOfStream
        return data

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int:
        """Like ``socket.recv_into``: read into ``buffer``, return how many bytes."""
        view = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(view))
        view[: len(data)] = data
        return len(data)

    # Writing -----------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the send buffer takes (waiting until it takes something)."""
        view = memoryview(data).cast("B")
        if not view:
            with self._lock:
                self._check_writable()
            return 0
        deadline = self._deadline()
        with self._lock:
            return self._send_some(view, deadline)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting while the send buffer is full.

        On a timeout some of the data may have been sent (as with a socket)."""
        view = memoryview(data).cast("B")
        deadline = self._deadline()
        with self._lock:
            if not view:
                self._check_writable()
            while view:
                view = view[self._send_some(view, deadline) :]

    def _send_some(self, view: memoryview, deadline: float | None) -> int:
        while True:
            sent = self.handle.write(view)
            if isinstance(sent, int):
                self._flush()
                return sent
            if sent is not Blocked.WAIT:
                self._raise(sent)
            self._wait(deadline)

    def _check_writable(self) -> None:
        blocked = self.handle.write(b"")
        if isinstance(blocked, Blocked) and blocked is not Blocked.WAIT:
            self._raise(blocked)

    # Ending ------------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        """``SHUT_WR``: finish our direction (written data is still delivered);
        ``SHUT_RD``: drop what arrives; ``SHUT_RDWR``: both."""
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise ValueError(f"invalid shutdown mode {how!r}")
        with self._lock:
            if self.handle.closed:
                self._raise(Blocked.CLOSED)
            if how in (socket.SHUT_RD, socket.SHUT_RDWR):
                self.handle.discard_incoming()
            if how in (socket.SHUT_WR, socket.SHUT_RDWR):
                blocked = self.handle.send_eof()
                if blocked is not None and blocked is not Blocked.FAILED:
                    self._raise(blocked)
            self._flush()
            self._changed.notify_all()

    def send_eof(self) -> None:
        """``shutdown(SHUT_WR)``, idempotent (anyio's name for it)."""
        with self._lock:
            if self.handle.eof_sent:
                return
        self.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Finish our direction (written data is still delivered) and stop reading;
        the stream's resources are released.  Idempotent."""
        with self._lock:
            if self.handle.close():
                self._ended()

    def reset(self, code: int = StreamCode.CANCELLED) -> None:
        """Abort both directions at once; unsent data is dropped.  Idempotent."""
        with self._lock:
            if self.handle.reset(code):
                self._ended()

    def _ended(self) -> None:
        self._flush()
        self._forget(self)
        self._changed.notify_all()
        self._run_failure_callbacks()

    def __enter__(self) -> TunnelStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Fed by the host (with the lock held) -------------------------------------

    def on_event(self, event: TunnelEvent) -> None:
        if self.handle.on_event(event):
            if self.handle.finished:
                self._forget(self)
                if self.handle.failure is not None:
                    self._run_failure_callbacks()
            self._changed.notify_all()

    def on_tunnel_closed(self, code: int, reason: str) -> None:
        self.handle.on_tunnel_closed(code, reason)
        self._changed.notify_all()
        self._run_failure_callbacks()

    def add_abort_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, with the lock held; it must not block) when the
        stream is reset, closed, or its tunnel closes: a relay uses it to wake a
        thread blocked on the other side."""
        with self._lock:
            if self.handle.closed or self.handle.failure is not None:
                callback()
            else:
                self._on_failure.append(callback)

    def _run_failure_callbacks(self) -> None:
        callbacks, self._on_failure = self._on_failure, []
        for callback in callbacks:
            callback()

    def wait_accepted(self, timeout: float | None) -> None:
        """(Opener) Wait for the peer's decision; raise if it refused."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while (opening := self.handle.opening) is Opening.PENDING:
                self._wait(deadline)
            if opening is Opening.TUNNEL_CLOSED:
                failure = self.handle.failure
                assert failure is not None
                raise failure_error(failure)
            if opening is Opening.REFUSED:
                raise StreamRefusedError(self.handle.refusal)

    # Internals ---------------------------------------------------------------

    def _deadline(self) -> float | None:
        timeout = self._timeout
        return None if timeout is None else time.monotonic() + timeout

    def _wait(self, deadline: float | None) -> None:
        if deadline is None:
            self._changed.wait()
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if self._timeout == 0:
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            raise TimeoutError("timed out")
        self._changed.wait(remaining)

    def _raise(self, blocked: Blocked) -> NoReturn:
        if blocked is Blocked.FAILED:
            failure = self.handle.failure
            assert failure is not None
            raise failure_error(failure)
        if blocked is Blocked.EOF_SENT:
            raise BrokenPipeError(errno.EPIPE, "the stream's sending side was shut down")
        raise OSError(errno.EBADF, "the stream is closed")
