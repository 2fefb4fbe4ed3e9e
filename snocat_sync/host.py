"""The pump: one UDP socket feeding one core endpoint, on one thread.

:class:`SyncHost` is the whole QUIC I/O of a snocat endpoint, server or client.  Its
pump thread waits in a ``selectors`` selector for datagrams, for the timer and for
a wake-up byte on a socket pair; it reads every waiting datagram into the core,
drains the core's events, sends what the core produced, and re-arms the timer.

User threads call into the core under the host's one lock (:attr:`SyncHost.lock`)
and then :meth:`SyncHost.flush`, which drains and transmits at once, in the calling
thread; the pump is woken only when the core's deadline changed.  Event handlers
and stream notifications therefore run with the lock held: they must not block.

Other sockets (a server's public TCP listeners) can be watched by the same pump
(:meth:`SyncHost.watch`), so accepting connections needs no thread of its own.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from snocat_proto._service.stream_table import StreamTable
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.endpoint import Endpoint
from snocat_proto._wire.events import (
    StreamRequested,
    TunnelEvent,
)
from snocat_proto._wire.network import NetworkAddress
from snocat_proto._wire.tunnel import TunnelConnection

from .stream import TunnelStream
from .udp import receive_batch, send_datagrams

logger = logging.getLogger("snocat.sync.host")

#: How long :meth:`SyncHost.stop` waits for the pump thread.
STOP_TIMEOUT = 5.0

#: Called with every tunnel-level event; for StreamRequested the new stream comes along.
EventHandler = Callable[[TunnelConnection, TunnelEvent, TunnelStream | None], None]


class SyncHost:
    """Runs ``endpoint`` on ``sock`` in a pump thread; see the module docstring."""

    def __init__(
        self,
        endpoint: Endpoint,
        sock: socket.socket,
        on_event: EventHandler,
        *,
        lock: threading.RLock | None = None,
        name: str = "snocat-pump",
    ) -> None:
        self.endpoint = endpoint
        self.sock = sock
        #: Guards the core, every stream and the owner's books.
        self.lock = lock if lock is not None else threading.RLock()
        self._on_event = on_event
        self._name = name
        self._streams: StreamTable[TunnelStream] = StreamTable()
        self._timer_at: float | None = None
        self._flushing = False
        self._flush_again = False
        self._stopping = False
        self._stopped = False
        self._pump_exited = False
        self._thread: threading.Thread | None = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        #: Work for the pump thread (selector changes), run before it next waits.
        self._calls: deque[Callable[[], None]] = deque()
        self.datagrams_dropped = 0

    @property
    def local_address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def in_pump(self) -> bool:
        return threading.current_thread() is self._thread

    # Lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the pump thread.  The UDP socket stays the owner's to close."""
        if self._thread is not None:
            raise RuntimeError("the pump is already running")
        self._selector.register(self.sock, selectors.EVENT_READ, self._receive)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        self.flush()

    def stop(self) -> None:
        """Stop and join the pump thread; nothing is sent after this returns."""
        with self.lock:
            self._stopping = True
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():  # would be a bug: every step of the pump is bounded
                logger.error("the pump thread %s did not stop", thread.name)
        with self.lock:
            self._stopped = True
            if thread is None and not self._pump_exited:
                self._pump_exited = True
                self._close_selector()

    # Watching other sockets --------------------------------------------------

    def watch(self, sock: socket.socket, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable()`` from the pump thread (without the lock) whenever
        ``sock`` is readable."""

        def register() -> None:
            self._selector.register(sock, selectors.EVENT_READ, on_readable)

        self._in_pump(register)

    def unwatch(self, sock: socket.socket) -> None:
        """Stop watching ``sock``; once this returns the pump no longer touches it."""
        self._in_pump(functools.partial(self._unregister, sock))

    def _unregister(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    def _in_pump(self, call: Callable[[], None]) -> None:
        """Run ``call`` in the pump thread and wait for it (the selector is not
        thread-safe).  Never call this with the lock held."""
        if self.in_pump:
            call()
            return
        done = threading.Event()

        def run() -> None:
            try:
                call()
            finally:
                done.set()

        with self.lock:
            if self._pump_exited:
                return  # the selector is closed: nothing is watched any more
            if self._thread is None:
                call()  # not started: nobody else uses the selector
                return
            self._calls.append(run)
        self._wake()
        done.wait()  # the pump runs it before it next waits, or as it exits

    # Streams -----------------------------------------------------------------

    def open_stream(
        self, tunnel: TunnelConnection, address: RouteAddress, timeout: float | None = None
    ) -> TunnelStream:
        """Open a stream to ``address`` on ``tunnel``'s peer and wait for its answer.

        Raises :class:`StreamRefusedError`, :class:`TunnelClosedError`, ``TimeoutError``
        or (the tunnel is not authenticated) ``LocalProtocolError``."""
        with self.lock:
            stream_id = tunnel.open_stream(address)
            stream = self._new_stream(tunnel, stream_id, address, accepted=False)
            self.flush(tunnel)
            try:
                stream.wait_accepted(timeout)
            except BaseException:
                stream.reset()
                raise
            return stream

    def accept(self, stream: TunnelStream) -> None:
        with self.lock:
            stream.tunnel.accept_stream(stream.stream_id)
            self.flush(stream.tunnel)

    def refuse(self, stream: TunnelStream) -> None:
        with self.lock:
            stream.tunnel.refuse_stream(stream.stream_id)
            self._forget(stream)
            self.flush(stream.tunnel)

    def streams_of(self, tunnel: TunnelConnection) -> list[TunnelStream]:
        with self.lock:
            return self._streams.of(tunnel)

    # The pump ----------------------------------------------------------------

    def flush(self, tunnel: TunnelConnection | None = None) -> None:
        """Drain events and send datagrams until the core is quiet; re-arm the timer.

        Pass the ``tunnel`` an application call changed, so its output is sent."""
        errors = getattr(self.endpoint, "internal_errors", None)
        while errors:
            # The endpoint closed the tunnel concerned; the rest carry on.
            logger.error("internal error in a tunnel, which was closed", exc_info=errors.popleft())
        with self.lock:
            if self._stopped:
                return
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
                    self._send(self.endpoint.datagrams_to_send(time.monotonic()))
                    if not self._flush_again:
                        break
            finally:
                self._flushing = False
            timer_at = self.endpoint.get_timer()
            changed = timer_at != self._timer_at
            self._timer_at = timer_at
        if changed and not self.in_pump:
            self._wake()

    def _run(self) -> None:
        try:
            while True:
                with self.lock:
                    if self._stopping:
                        break
                    calls = list(self._calls)
                    self._calls.clear()
                for call in calls:
                    self._guard(call)
                with self.lock:
                    timer_at = self._timer_at
                timeout = None if timer_at is None else max(0.0, timer_at - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    self._guard(key.data)
                self._guard(self._check_timer)
        finally:
            with self.lock:
                calls = list(self._calls)
                self._calls.clear()
                self._pump_exited = True
            for call in calls:
                self._guard(call)
            self._close_selector()

    def _guard(self, call: Callable[[], None]) -> None:
        """An error in one step costs that step only: the pump keeps running."""
        try:
            call()
        except Exception:
            logger.exception("the pump caught an error; it goes on")

    def _check_timer(self) -> None:
        with self.lock:
            timer_at = self._timer_at
            if timer_at is None or self._stopping:
                return
            now = time.monotonic()
            if now < timer_at:
                return
            self.endpoint.handle_timer(now)
            self._timer_at = None  # force re-arming even at the same deadline
            self.flush()

    def _receive(self) -> None:
        sock = self.sock
        with self.lock:
            receive_batch(sock, self.endpoint.receive_datagram, time.monotonic())
            self.flush()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # a wake-up is pending already
        except OSError:
            pass  # closed: the pump has stopped

    def _close_selector(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _send(self, datagrams: list[tuple[bytes, NetworkAddress]]) -> None:
        self.datagrams_dropped += send_datagrams(self.sock, datagrams)

    def _dispatch(self, tunnel: TunnelConnection, event: TunnelEvent) -> None:
        if self._streams.deliver(tunnel, event):
            return
        new_stream = None
        if isinstance(event, StreamRequested):
            new_stream = self._new_stream(tunnel, event.stream_id, event.address, accepted=True)
        try:
            self._on_event(tunnel, event, new_stream)
        except Exception:
            logger.exception("the handler of %s failed", type(event).__name__)

    def _new_stream(
        self, tunnel: TunnelConnection, stream_id: int, address: RouteAddress, *, accepted: bool
    ) -> TunnelStream:
        stream = TunnelStream(
            tunnel,
            stream_id,
            address,
            lock=self.lock,
            flush=functools.partial(self.flush, tunnel),
            forget=self._forget,
            accepted=accepted,
        )
        self._streams.add(stream)
        return stream

    def _forget(self, stream: TunnelStream) -> None:
        self._streams.forget(stream)
