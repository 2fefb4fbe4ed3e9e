"""Many streams in one QUIC connection, in memory: what the sender's packet
scheduling costs per packet as the number of streams grows (issue 16).

    python -m bench.many_streams [--bytes 20e6] [--streams 1,8,64]

Two :class:`QuicEngine` ends (snocat's engine, receive credit for consumed data) on a
fake clock, no sockets: ``--bytes`` split over N streams, client to server, every
stream kept full (at most ``Limits.stream_send_buffer`` unacknowledged, as a tunnel
does) and the receiver consuming at once.  Two figures per N:

* STREAM-frame attempts per packet: calls of ``QuicStreamSender.get_frame`` (every
  attempt to put a stream's data in a packet makes one) over the 1-RTT datagrams the
  sender built, counted in a run of its own;
* CPU ms/MB of both ends together, in an uninstrumented run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import ssl
import time
from collections.abc import Callable
from typing import Any

from aioquic.quic.events import StreamDataReceived
from aioquic.quic.stream import QuicStreamSender

from bench.common import MB, PATTERN, table
from snocat_proto._wire.certificates import generate_self_signed, install_identity
from snocat_proto._wire.engine import QuicEngine, handshake_complete, quic_configuration
from snocat_proto._wire.limits import Limits

SERVER = ("10.0.0.1", 4433)
CLIENT = ("10.0.0.2", 50000)
TICK = 0.0002
CHUNK = 64 * 1024

_IDENTITY = generate_self_signed(["localhost"], now=datetime.datetime.now(datetime.UTC))


def streams_transfer(
    size: int, streams: int, *, datagram: int = 1200, limits: Limits | None = None
) -> dict[str, float]:
    """Move ``size`` bytes over ``streams`` streams; CPU seconds, datagrams sent by
    the sender once the handshake was done, and bytes moved."""
    limits = limits or Limits(max_streams_per_tunnel=max(256, streams))
    server_config = quic_configuration(is_client=False, limits=limits, max_datagram_size=datagram)
    install_identity(server_config, *_IDENTITY)
    client_config = quic_configuration(
        is_client=True, limits=limits, server_name="localhost", max_datagram_size=datagram
    )
    client_config.verify_mode = ssl.CERT_NONE
    client = QuicEngine(configuration=client_config, limits=limits)
    server = QuicEngine(
        configuration=server_config,
        limits=limits,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    window = limits.tunnel_receive_window
    client.open_windows(connection_window=window, max_streams=streams)
    server.open_windows(connection_window=window, max_streams=streams)
    now = 0.0
    client.connect(SERVER, now=now)
    each = size // streams
    sent = dict.fromkeys(range(streams), 0)
    ids: list[int] = []
    received = 0
    datagrams = 0
    view = memoryview(PATTERN)
    start = time.process_time()
    while received < each * streams:
        now += TICK
        while client.next_event() is not None:
            pass
        if handshake_complete(client):
            while len(ids) < streams:
                ids.append(client.get_next_available_stream_id())
                client.send_stream_data(ids[-1], b"")
            for index, stream_id in enumerate(ids):
                while sent[index] < each:
                    room = limits.stream_send_buffer - client.send_buffered(stream_id)
                    if room < 16 * 1024 and room < each - sent[index]:
                        break
                    offset = sent[index] % len(PATTERN)
                    length = min(room, CHUNK, each - sent[index], len(PATTERN) - offset)
                    client.send_stream_data(stream_id, bytes(view[offset : offset + length]))
                    sent[index] += length
        out = client.datagrams_to_send(now)
        if ids:
            datagrams += len(out)
        for data, _ in out:
            server.receive_datagram(data, CLIENT, now)
        while (event := server.next_event()) is not None:
            if isinstance(event, StreamDataReceived) and event.data:
                received += len(event.data)
                server.acknowledge_received(event.stream_id, len(event.data))
        for data, _ in server.datagrams_to_send(now):
            client.receive_datagram(data, SERVER, now)
        for connection in (client, server):
            timer = connection.get_timer()
            if timer is not None and timer <= now:
                connection.handle_timer(now)
    return {
        "cpu": time.process_time() - start,
        "datagrams": datagrams,
        "bytes": each * streams,
    }


def count_attempts(run: Callable[[], dict[str, float]]) -> tuple[dict[str, float], int]:
    """``run()`` with every ``QuicStreamSender.get_frame`` call counted."""
    original = QuicStreamSender.get_frame
    calls = 0

    def counted(self: QuicStreamSender, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(self, *args, **kwargs)

    QuicStreamSender.get_frame = counted  # type: ignore[method-assign]
    try:
        result = run()
    finally:
        QuicStreamSender.get_frame = original  # type: ignore[method-assign]
    return result, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bytes", type=float, default=20e6)
    parser.add_argument("--streams", default="1,8,64")
    parser.add_argument("--datagram", type=int, default=1200)
    args = parser.parse_args()
    size = int(args.bytes)
    rows = []
    for streams in [int(n) for n in args.streams.split(",")]:
        counted, attempts = count_attempts(
            functools.partial(streams_transfer, size, streams, datagram=args.datagram)
        )
        plain = streams_transfer(size, streams, datagram=args.datagram)
        rows.append(
            [
                str(streams),
                f"{attempts / counted['datagrams']:.1f}",
                f"{1000 * plain['cpu'] / (plain['bytes'] / MB):.1f}",
            ]
        )
    print(
        f"\n## {size / 1e6:.0f} MB over N streams of one connection, in memory "
        f"({args.datagram} B datagrams)\n"
    )
    print(table(["streams", "STREAM-frame attempts per packet", "CPU ms/MB (both ends)"], rows))


if __name__ == "__main__":
    main()
