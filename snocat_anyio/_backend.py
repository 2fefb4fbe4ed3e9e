"""The anyio seam: what the flows need that waits, spawns or touches a socket.

The server's and client's flows (:mod:`._server_flows`, :mod:`._client_flows`) are
written once, as async code over the names below; ``snocat_sync`` generates its
blocking copy of them (``scripts/unasync.py``) and implements the same names with
threads in its own ``_backend``.  Each name means the same on both sides:

* :class:`Lock` guards the core against other threads: here a no-op, since an
  event loop runs one task at a time (code under it never awaits).
* :class:`Condition` is a notification with ``wait_for(predicate, timeout)``.
* :class:`TaskSet` runs one owner's tasks (a tunnel's services, a client session's)
  and stops them together.  Here each task is shielded from the caller's
  cancellation, so a cancelled ``serve()`` or ``run()`` still says goodbye, and
  :meth:`TaskSet.cancel` stops them; the blocking twin runs threads, which stop as
  their streams and sockets close.
* :func:`shield` protects cleanup from cancellation (nothing to protect in threads).
* :class:`Listener`, :func:`accepted`, :func:`connect_address`, :func:`connect_name`,
  :func:`resolve`, :func:`resolve_stream` and :func:`relay` are the TCP and DNS I/O;
  :func:`receive_within` and :func:`close_gracefully` read a visitor's first bytes
  and answer a refused one (the shared listeners).
* :class:`UdpSockets` reads non-blocking UDP sockets (a public UDP port's, a client
  flow's to its target) a batch at a time, until stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.stapled import MultiListener

from snocat_proto._wire.network import NetworkAddress, format_address

from ._bind import bind_port
from ._errors import SnocatError
from ._relay import read_on_demand, relay
from ._stream import TunnelStream
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

#: Loggers are ``snocat.server``, ``snocat.client``...
LOG_PREFIX = "snocat"
#: What a stream or connection that is gone raises.
BROKEN: tuple[type[BaseException], ...] = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)
#: ... or was refused (the errors a flow that gives up on a stream catches).
BROKEN_OR_REFUSED: tuple[type[BaseException], ...] = (*BROKEN, SnocatError)
EndOfStream = anyio.EndOfStream
#: A TCP connection as the flows hold it.
Connection = anyio.abc.SocketStream
#: Where a :class:`TaskSet` and a pump run their tasks.
Group = anyio.abc.TaskGroup

#: Pause after a failed ``accept()`` (e.g. out of file descriptors) before retrying.
ACCEPT_ERROR_PAUSE = 0.1


def current_time() -> float:
    """The clock the core runs on (the event loop's)."""
    return anyio.current_time()


class Lock:
    """No lock is needed on an event loop: see the module docstring."""

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


def shield() -> anyio.CancelScope:
    """Run the block to its end even if the caller is cancelled."""
    return anyio.CancelScope(shield=True)


def open_group() -> anyio.abc.TaskGroup:
    """A task group for a client session's pump and services; leaving it waits for
    every task (stop or cancel them first)."""
    return anyio.create_task_group()


async def join_group(group: anyio.abc.TaskGroup | None, timeout: float) -> list[str]:
    """Wait for the tasks of ``group``: here the task group does that as it exits."""
    return []


async def sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


class Condition:
    """Wake whoever waits for something to become true.  ``lock`` is the owner's
    :class:`Lock` (the blocking twin waits on it)."""

    def __init__(self, lock: Lock) -> None:
        # anyio.Event needs a running event loop: made on first use.
        self._event: anyio.Event | None = None

    def notify_all(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate()`` is true (True) or ``timeout`` passed (False)."""
        with anyio.move_on_after(timeout):
            while not predicate():
                if self._event is None:
                    self._event = anyio.Event()
                await self._event.wait()
        return predicate()


class TaskSet:
    """One owner's tasks, stopped together; see the module docstring."""

    def __init__(self, group: anyio.abc.TaskGroup | None, logger: logging.Logger, label: str):
        if group is None:
            raise RuntimeError("a TaskSet needs the task group it runs in")
        self._group = group
        self._logger = logger
        self._label = label
        self._scopes: set[anyio.CancelScope] = set()
        self._cancelled = False

    def __len__(self) -> int:
        return len(self._scopes)

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: Any, name: str = "") -> None:
        """Run ``fn(*args)``.  After :meth:`cancel` it starts cancelled, so its
        cleanup (``finally``) still runs.  An exception is logged and ends it alone."""
        scope = anyio.CancelScope(shield=True)
        self._scopes.add(scope)
        if self._cancelled:
            scope.cancel()
        self._group.start_soon(self._run, scope, fn, args, name=name or None)

    async def _run(
        self, scope: anyio.CancelScope, fn: Callable[..., Awaitable[object]], args: tuple[Any, ...]
    ) -> None:
        try:
            with scope:
                await fn(*args)
        except Exception:
            name = getattr(fn, "__name__", repr(fn))
            self._logger.exception("%s: %s failed", self._label, name)
        finally:
            self._scopes.discard(scope)

    def cancel(self) -> None:
        """Stop every task, and those spawned from now on."""
        self._cancelled = True
        for scope in list(self._scopes):
            scope.cancel()


# TCP -----------------------------------------------------------------------------


class Listener:
    """The listening sockets of one public port, and the tasks that accept on them."""

    def __init__(
        self,
        listener: MultiListener[anyio.abc.SocketStream] | None,
        port: int,
        sockets: list[socket.socket] | None = None,
    ) -> None:
        self.port = port
        self._logger = logging.getLogger(f"{LOG_PREFIX}.server")
        self._listener = listener
        if listener is not None:
            self._sockets = [
                s.extra(SocketAttribute.raw_socket)
                for s in listener.listeners
                if isinstance(s, anyio.abc.SocketListener)
            ]
        else:
            self._sockets = list(sockets or ())
        self.addresses = tuple(format_address(s.getsockname()) for s in self._sockets)
        self._accepting = anyio.CancelScope()
        self._started = False
        self._closed = anyio.Event()

    @classmethod
    async def open(cls, host: str | None, port: int) -> Listener:
        """Listen on every address of ``host`` (None: every interface); ``OSError`` if
        the port cannot be bound."""
        return cls(await anyio.create_tcp_listener(local_host=host, local_port=port), port)

    @classmethod
    def bind(cls, host: str | None, port: int) -> Listener:
        """Listen now, without waiting (before the event loop serves anything: a
        shared listener binds as the server starts); ``OSError`` if it cannot.
        Port 0 takes a free one (:attr:`port` says which)."""
        sockets = bind_port(host, port, socket.SOCK_STREAM)
        return cls(None, sockets[0].getsockname()[1], sockets)

    def start(
        self, host: object, tasks: TaskSet, on_accept: Callable[[socket.socket], None]
    ) -> None:
        """Accept in ``tasks`` until :meth:`aclose`; each connection goes to
        ``on_accept`` (which must not block)."""
        self._started = True
        tasks.spawn(self._serve, on_accept, name=f"accept-{self.port}")

    async def _serve(self, on_accept: Callable[[socket.socket], None]) -> None:
        try:
            with self._accepting:
                async with anyio.create_task_group() as tg:
                    for sub in self._sockets:
                        tg.start_soon(self._accept_loop, sub, on_accept)
        finally:
            with shield():
                await self._close_sockets()
            self._closed.set()

    async def _close_sockets(self) -> None:
        if self._listener is not None:
            await self._listener.aclose()
        else:
            for sock in self._sockets:
                sock.close()

    async def _accept_loop(
        self, sock: socket.socket, on_accept: Callable[[socket.socket], None]
    ) -> None:
        # Not listener.accept(): cancelling a pending accept as a connection arrives
        # drops that connection and raises in asyncio's loop (python/cpython#153761),
        # and this loop is stopped by cancellation.  Waiting for readability is safe.
        while True:
            await anyio.wait_readable(sock)
            try:
                client, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:  # out of file descriptors, buffers...
                self._logger.warning("accept on port %d failed: %s", self.port, exc)
                await anyio.sleep(ACCEPT_ERROR_PAUSE)
                continue
            on_accept(client)

    def close_now(self) -> None:
        """Close a listener that was bound and never started."""
        if self._started:
            raise RuntimeError("close_now() is for a listener that never started")
        for sock in self._sockets:
            sock.close()

    async def aclose(self) -> None:
        """Stop accepting and close the sockets; returns once they are closed."""
        with shield():
            if self._started:
                self._accepting.cancel()
                await self._closed.wait()
            else:
                await self._close_sockets()


# UDP ---------------------------------------------------------------------------

#: Called with a socket and the datagrams read from it at once (never blocks).
OnDatagrams = Callable[[socket.socket, list[tuple[bytes, NetworkAddress]]], None]


class UdpSockets:
    """Non-blocking UDP sockets, read in batches by a task of their owner's until
    stopped; they are theirs from now on (closed by :meth:`stop` or :meth:`aclose`)."""

    def __init__(self, sockets: list[socket.socket], batch: int) -> None:
        self.sockets = sockets
        self.addresses = tuple(format_address(s.getsockname()) for s in sockets)
        self.port = int(sockets[0].getsockname()[1]) if sockets else 0
        self._batch = batch
        self._scope = anyio.CancelScope()
        self._started = False
        self._stopped = False
        self._closed = anyio.Event()

    def start(self, host: object, tasks: TaskSet, on_datagrams: OnDatagrams) -> None:
        """Read in ``tasks`` until :meth:`stop`; each batch goes to ``on_datagrams``."""
        if self._stopped:
            return
        self._started = True
        tasks.spawn(self._serve, on_datagrams, name=f"udp-{self.port}")

    async def _serve(self, on_datagrams: OnDatagrams) -> None:
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    for sock in self.sockets:
                        tg.start_soon(self._read_loop, sock, on_datagrams)
        finally:
            self._close_sockets()
            self._closed.set()

    async def _read_loop(self, sock: socket.socket, on_datagrams: OnDatagrams) -> None:
        while True:
            await anyio.wait_readable(sock)
            batch = read_batch(sock, self._batch)
            if batch:
                on_datagrams(sock, batch)

    def _close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()

    def stop(self) -> None:
        """Stop reading and close the sockets (never waits: a reading task closes them
        as it ends).  Idempotent."""
        self._stopped = True
        if self._started:
            self._scope.cancel()
        else:
            self._close_sockets()
            self._closed.set()

    async def aclose(self) -> None:
        """:meth:`stop`, and return once the sockets are closed (a port is free)."""
        self.stop()
        with shield():
            await self._closed.wait()


async def accepted(sock: socket.socket) -> Connection:
    """A connection from an accepted socket (TCP_NODELAY, reading only when asked)."""
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return read_on_demand(await anyio.abc.SocketStream.from_socket(sock))


async def receive_within(conn: Connection, max_bytes: int, timeout: float) -> bytes:
    """What ``conn`` sends next, at most ``max_bytes``; ``b""`` once it ended its
    sending.  ``TimeoutError`` if nothing came within ``timeout`` seconds."""
    with anyio.fail_after(max(0.0, timeout)):
        try:
            return await conn.receive(max_bytes)
        except anyio.EndOfStream:
            return b""


async def close_gracefully(conn: Connection, reply: bytes, linger: float, max_bytes: int) -> None:
    """Send ``reply``, end our sending, then read and drop what ``conn`` still sends
    (at most ``max_bytes``, for at most ``linger`` seconds) before closing: a socket
    closed with unread data sends a reset, which may destroy the reply unread."""
    with shield():
        try:
            with anyio.move_on_after(linger):
                if reply:
                    await conn.send(reply)
                await conn.send_eof()
                dropped = 0
                while dropped < max_bytes:
                    dropped += len(await conn.receive(max_bytes - dropped))
        except BROKEN:
            pass
        except OSError:
            pass
        finally:
            await conn.aclose()


async def connect_address(
    family: socket.AddressFamily, host: str, port: int, timeout: float | None
) -> Connection:
    """A TCP connection (with TCP_NODELAY) to the IP address ``host``, on the event loop.

    ``anyio.connect_tcp`` resolves no IP literal either, but it runs happy eyeballs
    (a task group, a task, an event, a timeout) even for one address; dialling a
    non-blocking socket here costs about half as much per stream.  A failure raises
    the connect's own ``OSError`` (``ConnectionRefusedError``, ...).  The stream reads
    only when asked (:func:`~snocat_anyio._relay.read_on_demand`)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with anyio.fail_after(timeout):
            try:
                sock.connect((host, port))
            except (BlockingIOError, InterruptedError):  # the handshake is under way
                await anyio.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code)) from None
        return read_on_demand(await anyio.abc.SocketStream.from_socket(sock))
    except BaseException:
        sock.close()
        raise


async def connect_name(host: str, port: int, timeout: float | None) -> Connection:
    """A TCP connection to the name ``host`` (happy eyeballs across both families)."""
    with anyio.fail_after(timeout):
        tcp = await anyio.connect_tcp(host, port)
    raw = tcp.extra(SocketAttribute.raw_socket)
    if raw.family in (socket.AF_INET, socket.AF_INET6):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return read_on_demand(tcp)


async def resolve_stream(host: str, port: int, family: socket.AddressFamily) -> list[str]:
    """The addresses of ``host`` in ``family``, for TCP."""
    infos = await anyio.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    return [str(sockaddr[0]) for *_, sockaddr in infos]


async def send_within(stream: TunnelStream, data: bytes, timeout: float) -> bool:
    """Send ``data`` on ``stream`` within ``timeout`` seconds; False if that failed
    (the time ran out, or the stream or its tunnel is gone)."""
    with anyio.move_on_after(max(0.0, timeout)) as scope:
        try:
            await stream.send(data)
        except BROKEN_OR_REFUSED:
            return False
    return not scope.cancelled_caught


async def resolve(host: str, port: int) -> list[tuple[socket.AddressFamily, NetworkAddress]]:
    """The UDP addresses of ``host``, as ``recvfrom`` will report the peer (IPv6 as a
    4-tuple); ``OSError`` if it does not resolve."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    return [(family, _full_sockaddr(family, sockaddr)) for family, *_, sockaddr in infos]


def _full_sockaddr(family: int, sockaddr: tuple[str, int]) -> NetworkAddress:
    """anyio's ``getaddrinfo`` shortens IPv6 addresses to ``(host, port)``; aioquic
    compares addresses as tuples, so the aggregator's answers would come from an
    "unknown" path.  A numeric lookup (no DNS) restores flow info and scope id."""
    if family != socket.AF_INET6:
        return sockaddr
    host, port = sockaddr[0], sockaddr[1]
    info = socket.getaddrinfo(
        host, port, socket.AF_INET6, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST
    )
    return info[0][4]
