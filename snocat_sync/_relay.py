"""Copying bytes both ways between a tunnel stream and a TCP socket, half-closes included.

The calling thread copies tunnel -> socket; one helper thread copies socket -> tunnel.
A FIN on one side becomes a half-close of the other, and the opposite direction keeps
flowing (a TCP half-close is not the end of both).  An abort on either side aborts
the other: a stream reset or a closed tunnel shuts the socket down, which wakes a
thread blocked on it.  Returns the byte counts, for the observability events.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from snocat_proto._service.notices import RelayResult
from snocat_proto._service.visitors import ProxyHeaderGuard
from snocat_proto._wire.errors import RemoteProtocolError

from ._stream import TunnelStream


def relay(
    stream: TunnelStream,
    sock: socket.socket,
    chunk_size: int,
    *,
    initial: bytes = b"",
    header: bytes = b"",
    guard: ProxyHeaderGuard | None = None,
) -> RelayResult:
    """Copy both ways, ``chunk_size`` bytes at most per read (``Limits.relay_chunk_size``),
    until both directions have ended (or one side fails); then close the stream and
    the socket.

    ``initial``: bytes already read from ``sock`` (a shared listener's peek), sent to
    the tunnel first; ``header``: written to ``sock`` before anything from the tunnel
    (a PROXY protocol header), at once; ``guard``: ``sock`` 's bytes pass it on their
    way to the tunnel (it refuses a PROXY header, which aborts the relay)."""
    result = RelayResult()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def abort(error: BaseException) -> None:
        with lock:
            errors.append(error)
        stream.reset()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def shut_socket() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def to_tunnel() -> None:
        try:
            if initial:
                stream.sendall(initial)
                result.sent_to_tunnel += len(initial)
            while True:
                data = sock.recv(chunk_size)
                if not data:
                    held = guard.end() if guard is not None else b""
                    if held:
                        stream.sendall(held)
                        result.sent_to_tunnel += len(held)
                    stream.shutdown(socket.SHUT_WR)
                    return
                if guard is not None:
                    data = guard.feed(data)
                    if not data:
                        continue
                stream.sendall(data)
                result.sent_to_tunnel += len(data)
        except (OSError, RemoteProtocolError) as exc:
            abort(exc)

    stream.add_abort_callback(shut_socket)
    helper = threading.Thread(
        target=to_tunnel, name=f"snocat-relay-{stream.stream_id}", daemon=True
    )
    helper.start()
    try:
        if header:
            sock.sendall(header)
        while True:
            data = stream.recv(chunk_size)
            if not data:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                break
            sock.sendall(data)
            result.received_from_tunnel += len(data)
    except OSError as exc:
        abort(exc)
    finally:
        # Unbounded, as the other direction may flow for long after this one ended;
        # every abort (either side, or the tunnel's close) wakes the helper.
        helper.join()
        stream.close()
        sock.close()
    if errors:
        result.error = errors[0]
    return result
