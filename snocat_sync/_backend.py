"""The blocking seam: what the flows need that waits, spawns or touches a socket.

The server's and client's flows (``_server_flows``, ``_client_flows``) are generated
from ``snocat_anyio``'s (``scripts/unasync.py``); every name they import from here has
an anyio twin with the same meaning (see ``snocat_anyio/_backend.py``).  Here:

* :data:`Lock` is the one re-entrant lock of a server or client, shared with its pump:
  it guards the core, the books and every stream.  Code under it never blocks.
* :class:`Condition` waits on that lock.
* :class:`TaskSet` runs one owner's services in threads of a
  :class:`~snocat_sync._threads.ThreadGroup`; threads cannot be cancelled, so
  :meth:`TaskSet.cancel` only marks the set, and each thread ends as its streams and
  sockets close (a tunnel's close fails every stream of it).
* :func:`shield` has nothing to protect.
* :class:`Listener` watches its sockets on the pump's selector, so accepting needs
  no thread of its own.
* :func:`receive_within` and :func:`close_gracefully` read a visitor's first bytes
  and answer a refused one (the shared listeners).
* :class:`UdpSockets` watches non-blocking UDP sockets (a public UDP port's, a client
  flow's to its target) on the pump's selector and reads them a batch at a time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from snocat_proto._wire.network import NetworkAddress, format_address

from ._bind import bind_port
from ._errors import SnocatError
from ._host import TunnelHost
from ._relay import relay
from ._stream import EndOfStream, TunnelStream
from ._threads import ThreadGroup
from ._udp import read_batch

__all__ = [
    "BROKEN",
    "BROKEN_OR_REFUSED",
    "LOG_PREFIX",
    "Condition",
    "Connection",
    "EndOfStream",
    "Group",
    "Listener",
    "Lock",
    "TaskSet",
    "UdpSockets",
    "accepted",
    "close_gracefully",
    "connect_address",
    "connect_name",
    "current_time",
    "join_group",
    "open_group",
    "receive_within",
    "relay",
    "resolve",
    "resolve_stream",
    "send_within",
    "shield",
    "sleep",
]

#: Loggers are ``snocat.sync.server``, ``snocat.sync.client``...
LOG_PREFIX = "snocat.sync"
#: What a stream or connection that is gone raises (the stream errors are OSErrors).
BROKEN: tuple[type[BaseException], ...] = (OSError, EndOfStream)
#: ... or was refused (the errors a flow that gives up on a stream catches).
BROKEN_OR_REFUSED: tuple[type[BaseException], ...] = (*BROKEN, SnocatError)
#: A TCP connection as the flows hold it.
Connection = socket.socket
#: Where a :class:`TaskSet` runs its threads.
Group = ThreadGroup
Lock = threading.RLock
#: Pause after a failed ``accept()`` (e.g. out of file descriptors) before retrying.
ACCEPT_ERROR_PAUSE = 0.1

current_time = time.monotonic
sleep = time.sleep


def shield() -> contextlib.nullcontext[None]:
    return contextlib.nullcontext()


def open_group() -> ThreadGroup:
    """A thread group for a client session's services."""
    return ThreadGroup("snocat-session", logging.getLogger(f"{LOG_PREFIX}.client"))


def join_group(group: ThreadGroup | None, timeout: float) -> list[str]:
    """Wait up to ``timeout`` seconds for the threads of ``group``; the names of
    those still running."""
    if group is None:
        return []
    return [thread.name for thread in group.join(timeout)]


class Condition:
    """Wake whoever waits for something to become true, on the owner's lock."""

    def __init__(self, lock: threading.RLock) -> None:
        self._condition = threading.Condition(lock)

    def notify_all(self) -> None:
        with self._condition:
            self._condition.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate()`` is true (True) or ``timeout`` passed (False)."""
        with self._condition:
            return self._condition.wait_for(predicate, timeout)


class TaskSet:
    """One owner's threads; see the module docstring."""

    def __init__(self, group: ThreadGroup | None, logger: logging.Logger, label: str) -> None:
        if group is None:
            raise RuntimeError("a TaskSet needs the thread group it runs in")
        self._group = group
        self._label = label.replace(" ", "-")
        self.cancelled = False

    def spawn(self, fn: Callable[..., object], *args: Any, name: str = "") -> None:
        """Run ``fn(*args)`` in a thread; an exception is logged and ends it alone."""
        self._group.spawn(fn, *args, name=f"{self._label}-{name or getattr(fn, '__name__', '')}")

    def cancel(self) -> None:
        self.cancelled = True


# TCP -----------------------------------------------------------------------------


class Listener:
    """The listening sockets of one public port, watched by the pump."""

    def __init__(self, sockets: list[socket.socket], port: int) -> None:
        self.port = port
        self.addresses = tuple(format_address(s.getsockname()) for s in sockets)
        self._sockets = sockets
        self._host: TunnelHost | None = None
        self._tasks: TaskSet | None = None
        self._on_accept: Callable[[socket.socket], None] | None = None
        #: Guards watching and closing the sockets (never held with the host lock).
        self._guard = threading.Lock()
        self._stopped = False
        self._logger = logging.getLogger(f"{LOG_PREFIX}.server")

    @classmethod
    def open(cls, host: str | None, port: int) -> Listener:
        """Listen on every address of ``host`` (None: every interface); ``OSError`` if
        the port cannot be bound."""
        return cls(bind_port(host, port, socket.SOCK_STREAM), port)

    @classmethod
    def bind(cls, host: str | None, port: int) -> Listener:
        """Listen now (a shared listener binds as the server starts); ``OSError`` if
        it cannot.  Port 0 takes a free one (:attr:`port` says which)."""
        sockets = bind_port(host, port, socket.SOCK_STREAM)
        return cls(sockets, sockets[0].getsockname()[1])

    def start(
        self, host: TunnelHost | None, tasks: TaskSet, on_accept: Callable[[socket.socket], None]
    ) -> None:
        """Accept on the pump thread until :meth:`close`; each connection goes to
        ``on_accept`` (which must not block).  Call without the host's lock."""
        if host is None:
            raise RuntimeError("the listener needs the pump that watches it")
        self._host, self._tasks, self._on_accept = host, tasks, on_accept
        with self._guard:
            if not self._stopped:
                for sock in self._sockets:
                    self._watch(sock)

    def _watch(self, sock: socket.socket) -> None:
        assert self._host is not None
        self._host.watch(sock, functools.partial(self._accept_ready, sock))

    def _accept_ready(self, listener: socket.socket) -> None:
        """(Pump thread, no lock) Accept what is waiting."""
        assert self._on_accept is not None and self._tasks is not None
        while True:
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of file descriptors, buffers...
                self._logger.warning("accept on port %d failed: %s", self.port, exc)
                # The listener stays readable: pause it, or the pump would spin.
                assert self._host is not None
                self._host.unwatch(listener)
                self._tasks.spawn(self._resume, listener, name=f"resume-{self.port}")
                return
            self._on_accept(client)

    def _resume(self, listener: socket.socket) -> None:
        time.sleep(ACCEPT_ERROR_PAUSE)
        with self._guard:
            if not self._stopped:
                self._watch(listener)

    def close_now(self) -> None:
        """Close a listener that was bound and never started."""
        self.close()

    def close(self) -> None:
        """Stop accepting and close the sockets (idempotent; call without the host's lock)."""
        with self._guard:
            if self._stopped:
                return
            self._stopped = True
            for sock in self._sockets:
                if self._host is not None:
                    self._host.unwatch(sock)
                sock.close()


# UDP ---------------------------------------------------------------------------

#: Called with a socket and the datagrams read from it at once (never blocks).
OnDatagrams = Callable[[socket.socket, list[tuple[bytes, NetworkAddress]]], None]


class UdpSockets:
    """Non-blocking UDP sockets, watched by the pump and read there in batches until
    stopped; they are theirs from now on (closed by :meth:`stop` or :meth:`close`)."""

    def __init__(self, sockets: list[socket.socket], batch: int) -> None:
        self.sockets = sockets
        self.addresses = tuple(format_address(s.getsockname()) for s in sockets)
        self.port = int(sockets[0].getsockname()[1]) if sockets else 0
        self._batch = batch
        self._host: TunnelHost | None = None
        #: Guards watching and closing the sockets.
        self._guard = threading.Lock()
        self._stopped = False

    def start(self, host: TunnelHost | None, tasks: TaskSet, on_datagrams: OnDatagrams) -> None:
        """Read on the pump thread (without the lock) until :meth:`stop`; each batch
        goes to ``on_datagrams``.  Call from the pump thread, or without the lock."""
        if host is None:
            raise RuntimeError("UDP sockets need the pump that watches them")
        with self._guard:
            if self._stopped:
                return
            self._host = host
            for sock in self.sockets:
                host.watch(sock, functools.partial(self._ready, sock, on_datagrams))

    def _ready(self, sock: socket.socket, on_datagrams: OnDatagrams) -> None:
        batch = read_batch(sock, self._batch)
        if batch:
            on_datagrams(sock, batch)

    def stop(self) -> None:
        """Stop watching and close the sockets (idempotent).  Call from the pump
        thread, or without the lock."""
        with self._guard:
            if self._stopped:
                return
            self._stopped = True
            for sock in self.sockets:
                if self._host is not None:
                    self._host.unwatch(sock)
                sock.close()

    def close(self) -> None:
        """:meth:`stop` (the sockets are closed when it returns)."""
        self.stop()


def accepted(sock: socket.socket) -> Connection:
    """A blocking connection from an accepted socket, with TCP_NODELAY."""
    sock.setblocking(True)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive_within(conn: Connection, max_bytes: int, timeout: float) -> bytes:
    """What ``conn`` sends next, at most ``max_bytes``; ``b""`` once it ended its
    sending.  ``TimeoutError`` if nothing came within ``timeout`` seconds."""
    conn.settimeout(max(0.001, timeout))
    try:
        return conn.recv(max_bytes)
    finally:
        with contextlib.suppress(OSError):
            conn.settimeout(None)


def close_gracefully(conn: Connection, reply: bytes, linger: float, max_bytes: int) -> None:
    """Send ``reply``, end our sending, then read and drop what ``conn`` still sends
    (at most ``max_bytes``, for at most ``linger`` seconds) before closing: a socket
    closed with unread data sends a reset, which may destroy the reply unread."""
    deadline = time.monotonic() + linger
    try:
        conn.settimeout(linger)
        if reply:
            conn.sendall(reply)
        conn.shutdown(socket.SHUT_WR)
        dropped = 0
        while dropped < max_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            conn.settimeout(remaining)
            data = conn.recv(max_bytes - dropped)
            if not data:
                break
            dropped += len(data)
    except OSError:
        pass
    finally:
        conn.close()


def connect_address(
    family: socket.AddressFamily, host: str, port: int, timeout: float | None
) -> Connection:
    """A blocking TCP connection (with TCP_NODELAY) to the IP address ``host``."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_name(host: str, port: int, timeout: float | None) -> Connection:
    """A blocking TCP connection to the name ``host``, each of its addresses in turn."""
    tcp = socket.create_connection((host, port), timeout=timeout)
    tcp.settimeout(None)
    if tcp.family in (socket.AF_INET, socket.AF_INET6):
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return tcp


def resolve_stream(host: str, port: int, family: socket.AddressFamily) -> list[str]:
    """The addresses of ``host`` in ``family``, for TCP."""
    infos = socket.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    return [str(sockaddr[0]) for *_, sockaddr in infos]


def resolve(host: str, port: int) -> list[tuple[socket.AddressFamily, NetworkAddress]]:
    """The UDP addresses of ``host`` (the stdlib gives IPv6 as the full 4-tuple, as
    ``recvfrom`` reports the peer); ``OSError`` if it does not resolve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    return [(family, sockaddr) for family, *_, sockaddr in infos]


def send_within(stream: TunnelStream, data: bytes, timeout: float) -> bool:
    """Send ``data`` on ``stream`` within ``timeout`` seconds; False if that failed
    (the time ran out, or the stream or its tunnel is gone)."""
    try:
        stream.settimeout(max(0.0, timeout))
        stream.sendall(data)
    except BROKEN_OR_REFUSED:
        return False
    finally:
        stream.settimeout(None)
    return True
