"""Copying bytes both ways between two anyio byte streams, half-closes included.

A FIN on one side becomes ``send_eof()`` on the other, and the opposite direction
keeps flowing (a TCP half-close is not the end of both).  An abort on either side
aborts the other.  Returns the byte counts, for the observability events.
"""

from __future__ import annotations

import asyncio

import anyio
import anyio.abc

from snocat_proto._service.notices import RelayResult
from snocat_proto._service.visitors import ProxyHeaderGuard
from snocat_proto._wire.errors import RemoteProtocolError

from ._stream import TunnelStream

#: What ends a relay as an abort: a side that broke, or a guard that refused (a
#: PROXY header from a peer not trusted to send one).
_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, RemoteProtocolError)


def read_on_demand(stream: anyio.abc.SocketStream) -> anyio.abc.SocketStream:
    """Make ``stream`` read from its socket only while a ``receive()`` waits.

    On asyncio, anyio's socket stream starts reading as soon as it is made and pauses
    only after a ``receive()`` that had to wait; until then every chunk the peer sends
    is queued.  A TCP client that sends at once (any upload) while the tunnel's far end
    reads slowly keeps that queue from ever emptying: the aggregator took in a whole
    gigabyte ahead of a slow target.  Paused here, the stream takes at most a chunk or
    two per wait and the kernel's socket buffer pushes back on the sender.  trio's
    streams read only inside ``receive()`` already.
    """
    transport = getattr(stream, "_transport", None)
    if isinstance(transport, asyncio.ReadTransport) and transport.is_reading():
        transport.pause_reading()
    return stream


async def _copy(
    source: anyio.abc.ByteReceiveStream,
    sink: anyio.abc.ByteStream,
    counter: list[int],
    chunk_size: int,
    first: bytes = b"",
    guard: ProxyHeaderGuard | None = None,
) -> None:
    if first:
        await sink.send(first)
        counter[0] += len(first)
    while True:
        try:
            data = await source.receive(chunk_size)
        except anyio.EndOfStream:
            break
        if guard is not None:
            data = guard.feed(data)
            if not data:
                continue
        await sink.send(data)
        counter[0] += len(data)
    if guard is not None and (held := guard.end()):
        await sink.send(held)
        counter[0] += len(held)
    await sink.send_eof()


async def relay(
    tunnel_stream: TunnelStream,
    other: anyio.abc.ByteStream,
    chunk_size: int,
    *,
    initial: bytes = b"",
    header: bytes = b"",
    guard: ProxyHeaderGuard | None = None,
) -> RelayResult:
    """Copy both ways, ``chunk_size`` bytes at most per read (``Limits.relay_chunk_size``),
    until both directions have ended (or one side fails); then close both.

    ``initial``: bytes already read from ``other`` (a shared listener's peek), sent to
    the tunnel first; ``header``: written to ``other`` before anything from the tunnel
    (a PROXY protocol header), at once; ``guard``: ``other`` 's bytes pass it on their
    way to the tunnel (it refuses a PROXY header, which aborts the relay)."""
    result = RelayResult()
    to_tunnel = [0]
    from_tunnel = [0]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_copy, other, tunnel_stream, to_tunnel, chunk_size, initial, guard)
            tg.start_soon(_relay_back, tunnel_stream, other, from_tunnel, chunk_size, header)
    except* _BROKEN as group:
        result.error = group.exceptions[0]
        tunnel_stream.reset()
    finally:
        result.sent_to_tunnel = to_tunnel[0]
        result.received_from_tunnel = from_tunnel[0]
        with anyio.CancelScope(shield=True):
            await tunnel_stream.aclose()
            await other.aclose()
    return result


async def _relay_back(
    tunnel_stream: TunnelStream,
    other: anyio.abc.ByteStream,
    counter: list[int],
    chunk_size: int,
    header: bytes,
) -> None:
    if header:
        await other.send(header)
    await _copy(tunnel_stream, other, counter, chunk_size)
