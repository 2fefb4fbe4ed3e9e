"""The pump's UDP system calls alone, with and without UDP GSO/GRO: CPU per MB to send
and to receive datagrams of one size over loopback, through snocat's own
``_udp.send_datagrams`` / ``_udp.receive_batch``.

    python -m bench.udp_batching [--bytes 200e6] [--sizes 1200,1452,9000] [--segments 16]

No QUIC and no event loop: one process sends a burst (as much as the receive buffer
holds), then reads it back, and the CPU time of each half is added up.  This is the
part of a tunnel's CPU that batching can save; bench/throughput.py (``--compare-batching``)
measures what is left of it in a whole tunnel.
"""

from __future__ import annotations

import argparse
import socket
import time

from bench.common import MB, table
from snocat_anyio import _udp

#: Bytes in flight per burst: well under the receive buffer, so nothing is dropped.
BURST = 1 << 20
RECEIVE_BUFFER = 8 << 20
#: Linux's SO_RCVBUFFORCE (root may pass net.core.rmem_max), not in Python 3.11.
SO_RCVBUFFORCE = 33


def measure(size: int, total: int, segments: int) -> tuple[float, float, int]:
    """``(send CPU ms/MB, receive CPU ms/MB, datagrams lost)`` for ``total`` bytes."""
    sender = _udp.bind_udp("127.0.0.1", 0)
    receiver = _udp.bind_udp("127.0.0.1", 0)
    try:
        try:
            receiver.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except OSError:
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sending = _udp.UdpBatching(sender, segments)
        receiving = _udp.UdpBatching(receiver, segments)
        addr = receiver.getsockname()
        burst = [(bytes([i % 251]) * size, addr) for i in range(max(1, BURST // size))]
        received = 0
        sent = 0
        send_cpu = receive_cpu = 0.0

        def count(data: bytes, _addr: object, _now: float) -> None:
            nonlocal received
            received += 1

        while sent * size < total:
            start = time.process_time()
            # In slices, as a pump sends what one flush produced.
            for offset in range(0, len(burst), 64):
                _udp.send_datagrams(sender, burst[offset : offset + 64], sending)
            send_cpu += time.process_time() - start
            sent += len(burst)
            start = time.process_time()
            while received < sent:
                before = received
                _udp.receive_batch(receiver, count, 0.0, 64, receiving)
                if received == before:
                    break  # lost: the rest will not come
            receive_cpu += time.process_time() - start
        moved = sent * size / MB
        return 1000 * send_cpu / moved, 1000 * receive_cpu / moved, sent - received
    finally:
        sender.close()
        receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bytes", type=float, default=200e6)
    parser.add_argument("--sizes", default="1200,1452,9000")
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        results = {}
        for label, segments in (("one per call", 1), (f"GSO/GRO x{args.segments}", args.segments)):
            runs = sorted(
                (measure(size, int(args.bytes), segments) for _ in range(args.repeat)),
                key=lambda r: r[0] + r[1],
            )
            results[label] = runs[len(runs) // 2]
        plain = results["one per call"]
        for label, (send, receive, lost) in results.items():
            rows.append(
                [
                    f"{size} B, {label}",
                    f"{send:.1f}",
                    f"{receive:.1f}",
                    f"{(plain[0] + plain[1]) / (send + receive):.2f}",
                    str(lost),
                ]
            )
    print(f"\n## UDP system calls alone, {args.bytes / 1e6:.0f} MB, median of {args.repeat}\n")
    headers = ["datagrams", "send CPU ms/MB", "receive CPU ms/MB", "speed-up", "lost"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
