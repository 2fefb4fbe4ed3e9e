"""The pump: one UDP socket feeding one core endpoint, on one thread.

:class:`TunnelHost` is the whole QUIC I/O of a snocat endpoint, server or client.
Its pump thread waits in a ``selectors`` selector for datagrams, for the timer and
for a wake-up byte on a socket pair; it reads every waiting datagram into the core
and lets the core's :class:`~snocat_proto._service.pump.Pump` drain events,
transmit and re-arm.

User threads call into the core under the host's one lock (:attr:`TunnelHost.lock`)
and then :meth:`TunnelHost.flush`, which drains and transmits at once, in the calling
thread; the pump is woken only when the core's deadline moved earlier.  Event handlers
and stream notifications therefore run with the lock held: they must not block.

Other sockets (a server's public TCP listeners) can be watched by the same pump
(:meth:`TunnelHost.watch`), so accepting connections needs no thread of its own.
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

from snocat_proto._service.pump import EventHandler, Pump
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.endpoint import Endpoint
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.network import NetworkAddress
from snocat_proto._wire.tunnel import TunnelConnection

from ._stream import TunnelStream
from ._udp import UdpBatching, receive_batch, send_datagrams

logger = logging.getLogger("snocat.sync.host")

#: How long :meth:`SyncHost.stop` waits for the pump thread.
STOP_TIMEOUT = 5.0


class TunnelHost:
    """Runs ``endpoint`` on ``sock`` in a pump thread; see the module docstring."""

    def __init__(
        self,
        endpoint: Endpoint,
        sock: socket.socket,
        on_event: EventHandler[TunnelStream],
        *,
        limits: Limits,
        lock: threading.RLock,
        name: str = "snocat-pump",
        on_unreachable: Callable[[OSError], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.sock = sock
        #: Guards the core, every stream and the owner's books.
        self.lock = lock
        self.pump: Pump[TunnelStream] = Pump(endpoint, on_event, self._new_stream)
        self._batch = limits.udp_receive_batch
        #: GSO and GRO on this socket, while the kernel takes them.
        self.batching = UdpBatching(sock, limits.udp_segments_per_call)
        #: Told when the socket reports the peer unreachable (a connected client socket).
        self._on_unreachable = on_unreachable
        self._name = name
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

    def start(self, group: object = None) -> None:
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
            stream = self.pump.open_stream(tunnel, address)
            self.flush(tunnel)
            try:
                stream.wait_accepted(timeout)
            except BaseException:
                stream.reset()
                raise
            return stream

    def accept(self, stream: TunnelStream) -> None:
        with self.lock:
            self.pump.accept(stream)
            self.flush(stream.tunnel)

    def refuse(self, stream: TunnelStream) -> None:
        with self.lock:
            self.pump.refuse(stream)
            self.flush(stream.tunnel)

    def streams_of(self, tunnel: TunnelConnection) -> list[TunnelStream]:
        with self.lock:
            return self.pump.streams.of(tunnel)

    # The pump ----------------------------------------------------------------

    def flush(self, tunnel: TunnelConnection | None = None) -> None:
        """Drain events and send datagrams until the core is quiet; re-arm the timer.

        Pass the ``tunnel`` an application call changed, so its output is sent."""
        with self.lock:
            if self._stopped:
                return
            for error in self.pump.internal_errors():
                logger.error("internal error in a tunnel, which was closed", exc_info=error)
            wake = self.pump.flush(time.monotonic(), self._send, tunnel)
        if wake and not self.in_pump:
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
                    timer_at = self.pump.timer_at
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
            timer_at = self.pump.timer_at
            if timer_at is None or self._stopping:
                return
            now = time.monotonic()
            if now < timer_at:
                return
            self.pump.handle_timer(now, self._send)

    def _receive(self) -> None:
        sock = self.sock
        with self.lock:
            now = time.monotonic()
            self._unreachable(
                receive_batch(sock, self.endpoint.receive_datagram, now, self._batch, self.batching)
            )
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
            lock=self.lock,
            flush=functools.partial(self.flush, tunnel),
            forget=self.pump.streams.forget,
            accepted=accepted,
        )
